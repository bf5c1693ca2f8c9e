"""Small helpers shared by the whole package (atomic directory writes)."""
