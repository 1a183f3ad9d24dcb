"""Generation: sampling (`sampling`), the decode loop and stop strings (`generate`)."""
