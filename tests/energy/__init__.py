"""Energy and carbon tests."""
