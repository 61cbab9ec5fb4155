"""Data shipped with gridswarm.

tinyshakespeare.txt: karpathy/char-rnn data/tinyshakespeare/input.txt; the text is public domain.
"""
