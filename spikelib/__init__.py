"""Support code shared by the numbered stages: stage import and the checkpoint format."""
