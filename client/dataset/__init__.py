"""The edit-dataset factory: read-only source folders → decompose → edit → export → QA report (see stages.py)."""
