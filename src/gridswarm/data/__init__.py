"""Data files shipped with gridswarm (tinyshakespeare.txt: public domain, from karpathy/char-rnn)."""
