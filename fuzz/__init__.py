"""Coverage-guided fuzz targets (atheris) for the parsers of untrusted bytes; see fuzz/run.py."""
