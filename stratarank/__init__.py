"""The stratarank command line."""
