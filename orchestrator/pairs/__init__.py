"""Preference pairs: selection from scores, the length guard, and building the pairs of a round."""
