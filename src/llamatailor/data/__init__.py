"""Data: input formats, reading, templating with loss masks, splitting, the prepare stage."""
