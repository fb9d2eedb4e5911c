"""Operational tools beside the reading path: memory estimate, doctor, data checks, hang forensics.

Each is called from train.py in a line or two; none is needed to understand how training works."""
