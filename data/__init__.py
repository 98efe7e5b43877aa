"""kvlab's data files. This folder installs as ``kvlab._data`` so a wheel carries it; read it
through ``kvlab.data`` (provenance of every file: README.md here)."""
