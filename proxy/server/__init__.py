"""The HTTP layer: aiohttp app factory, routes, auth and error rendering."""
