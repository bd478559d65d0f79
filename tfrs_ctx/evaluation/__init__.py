"""Evaluation: ranking metrics with bootstrap intervals, and the report."""
