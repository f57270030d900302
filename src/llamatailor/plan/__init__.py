"""The planner: peak training memory per device, term by term, and which method fits."""
