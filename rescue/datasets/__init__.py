"""Datasets: each yields `Sample`s by id; subsetting and sharding act on ids only."""
