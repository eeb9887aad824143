"""kamrad: the HTTP+JSON layer over the engine, on a Unix socket under the data root."""
