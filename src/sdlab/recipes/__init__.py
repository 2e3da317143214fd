"""Recipes: the rules of one face (the web UI's, a node graph's) written over the generation steps."""
