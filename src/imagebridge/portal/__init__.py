"""The portal: the hub's web pages for people, over the same services as the API."""
