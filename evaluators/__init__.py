"""Accuracy curves, AUAC, validity checks, audits and reports."""
