"""gridswarm.ledger"""
