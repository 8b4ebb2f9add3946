"""Ray Tune: the search space, the searches and their report."""
