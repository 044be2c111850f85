"""One script per study; each reads an ml_collections config and writes results/<name>/<time>/."""
