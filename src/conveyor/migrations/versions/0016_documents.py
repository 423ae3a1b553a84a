"""Documents: ingested files, their chunks and vectors, and a full-text index.

``conveyor_documents`` holds one row per upload (unique by collection and SHA-256)
and ``conveyor_document_chunks`` its chunks with their page ranges, offsets and
embeddings (float32 bytes). Full-text search is native to each database: a
generated ``tsvector`` column with a GIN index on PostgreSQL, an external-content
FTS5 table kept by triggers on SQLite.

Revision ID: 0016
Revises: 0005
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from conveyor.models import BigId, UTCDateTime

revision = "0016"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "conveyor_documents",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("collection", sa.String(200), nullable=False),
        sa.Column("filename", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("pipeline_id", sa.String(36), nullable=True),
        sa.Column("pages", sa.Integer(), nullable=True),
        sa.Column("chunk_count", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("extracted", sa.JSON(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.UniqueConstraint("collection", "sha256", name="uq_conveyor_documents_content"),
    )
    op.create_table(
        "conveyor_document_chunks",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column(
            "document_id",
            sa.String(36),
            sa.ForeignKey("conveyor_documents.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("collection", sa.String(200), nullable=False),
        sa.Column("ordinal", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("page_start", sa.Integer(), nullable=False),
        sa.Column("page_end", sa.Integer(), nullable=False),
        sa.Column("start_offset", sa.Integer(), nullable=False),
        sa.Column("end_offset", sa.Integer(), nullable=False),
        sa.Column("embedding", sa.LargeBinary(), nullable=True),
        sa.UniqueConstraint("document_id", "ordinal", name="uq_conveyor_document_chunks_ordinal"),
    )
    op.create_index(
        "ix_conveyor_document_chunks_collection", "conveyor_document_chunks", ["collection"]
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "ALTER TABLE conveyor_document_chunks ADD COLUMN tsv tsvector"
            " GENERATED ALWAYS AS (to_tsvector('english', text)) STORED"
        )
        op.execute(
            "CREATE INDEX ix_conveyor_document_chunks_tsv ON conveyor_document_chunks"
            " USING gin (tsv)"
        )
    else:
        op.execute(
            "CREATE VIRTUAL TABLE conveyor_document_chunks_fts USING fts5("
            "text, content='conveyor_document_chunks', content_rowid='id',"
            " tokenize='porter unicode61')"
        )
        op.execute(
            "CREATE TRIGGER conveyor_document_chunks_ai AFTER INSERT ON conveyor_document_chunks"
            " BEGIN INSERT INTO conveyor_document_chunks_fts(rowid, text)"
            " VALUES (new.id, new.text); END"
        )
        op.execute(
            "CREATE TRIGGER conveyor_document_chunks_ad AFTER DELETE ON conveyor_document_chunks"
            " BEGIN INSERT INTO conveyor_document_chunks_fts(conveyor_document_chunks_fts,"
            " rowid, text) VALUES ('delete', old.id, old.text); END"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        op.execute("DROP TRIGGER IF EXISTS conveyor_document_chunks_ad")
        op.execute("DROP TRIGGER IF EXISTS conveyor_document_chunks_ai")
        op.execute("DROP TABLE IF EXISTS conveyor_document_chunks_fts")
    op.drop_index("ix_conveyor_document_chunks_collection", table_name="conveyor_document_chunks")
    op.drop_table("conveyor_document_chunks")
    op.drop_table("conveyor_documents")
