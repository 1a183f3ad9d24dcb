"""Training: a loss, its gradient, an optimizer step, and the loop that repeats them."""
