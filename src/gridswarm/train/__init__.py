"""gridswarm.train"""
