"""The bottom floor: data types every stage passes. Imports nothing of odpo."""
