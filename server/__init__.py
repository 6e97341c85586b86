"""cliplens.server."""
