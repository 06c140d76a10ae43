-- One PostgreSQL server, one database per service that keeps metadata.
CREATE DATABASE registry OWNER nanochat;
CREATE DATABASE trainer OWNER nanochat;
