"""Clinician-facing HTML report from an evaluation folder."""
