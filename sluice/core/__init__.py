"""What every stage shares: the errors, the settings, the Redis schema and its Lua scripts, the
Redis client, and the protocol versions a release checks at start-up."""
