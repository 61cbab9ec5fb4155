"""gridswarm.energy"""
