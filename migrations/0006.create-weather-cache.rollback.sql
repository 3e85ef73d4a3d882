DROP TABLE weather_cache;
