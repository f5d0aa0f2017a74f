"""Model factories and data generators that the specs in this folder refer to."""
