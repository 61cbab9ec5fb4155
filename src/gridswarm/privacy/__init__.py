"""gridswarm.privacy"""
