"""Storage: the SurrealDB gateway, schema and ids. (Blob stores arrive with inbound mail.)"""

from inbox.storage.db import Database, DbThrow, new_id, plain

__all__ = ["Database", "DbThrow", "new_id", "plain"]
