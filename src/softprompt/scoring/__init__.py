"""Scoring: rank classification over label words and generation metrics (`metrics`), what a
run optimises and scores (`objectives`), labels for new texts (`classify`), templates with
a `{prompt}` marker (`compose`) and ensembles of prompts in one pass (`ensemble`)."""
