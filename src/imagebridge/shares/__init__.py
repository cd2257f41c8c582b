"""Legal access: studies and reports shared with external users for a limited time."""
