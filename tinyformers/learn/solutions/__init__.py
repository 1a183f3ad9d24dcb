"""The solutions of the course's exercises, one module per chapter (ch01.py ... ch08.py).

`tinyformers learn start N` writes a chapter's template from its module here: each function's
signature and docstring, the body left to the learner. Read a solution after your own passes.
"""
