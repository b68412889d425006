"""What to hook and how: thin adapters that feed the pure statistics into a monitor's buffer."""
