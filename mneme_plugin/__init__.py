"""mneme-plugin."""
