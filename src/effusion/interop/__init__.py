"""Other libraries' model folders in and out of effusion run directories."""
