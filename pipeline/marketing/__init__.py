"""Marketing: templates, segments, campaigns and the house layout."""
