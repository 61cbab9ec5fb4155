"""gridswarm.hub"""
