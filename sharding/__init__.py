"""Sharding plans and sharders for the towers' embedding tables, applied from outside the
model code."""
