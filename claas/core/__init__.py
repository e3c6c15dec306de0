"""Shared configuration, wire types and model loading."""
