"""Foundations every layer may use: the settings' types and defaults, the exit statuses every command reports,
and files that appear whole. Imports nothing else of the backend; no torch, no ZeroMQ."""
