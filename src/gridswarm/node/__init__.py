"""gridswarm.node"""
