"""The lab: a page that shows what a model does with a prompt while the learner types it.

Tokens, embedding vectors and their nearest tokens, every head's attention, the logit lens,
the next-token probabilities under a temperature slider, and what switching a head off does
to them. compute.py gets the numbers from the model's own methods, routes.py serves them and
the page (static/: plain HTML, CSS and JavaScript, nothing fetched from the network), links.py
points each view at its chapter of the course and the lines of code that compute it.
"""

from tinyformers.lab.compute import Lab, LabError
from tinyformers.lab.routes import add_lab, create_app

__all__ = ["Lab", "LabError", "add_lab", "create_app"]
