"""gridswarm.sim"""
