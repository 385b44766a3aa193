"""Small utilities of wsis_d2 (as detectron2.utils)."""
