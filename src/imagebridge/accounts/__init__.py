"""User accounts: passwords, two-factor login, users and their roles."""
