"""User profiles and chat history through SQLAlchemy: a SQLite file by default, PostgreSQL for several
replicas that share users (`--db postgresql+psycopg://...`)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import JSON, Float, Integer, String, Text, create_engine, delete, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

PROFILE_FIELDS = ("name", "expertise", "interests", "tone", "language", "notes")


class _Base(DeclarativeBase):
    pass


class ProfileRow(_Base):
    __tablename__ = "ayar_profiles"
    user_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    data: Mapped[dict] = mapped_column(JSON)
    updated: Mapped[float] = mapped_column(Float)


class TurnRow(_Base):
    __tablename__ = "ayar_history"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(String(128), index=True)
    model: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    created: Mapped[float] = mapped_column(Float)


@dataclass
class Store:
    url: str
    cap: int = 200  # messages kept per user and model

    def __post_init__(self):
        kw = (
            {"connect_args": {"check_same_thread": False}} if self.url.startswith("sqlite") else {"pool_pre_ping": True}
        )
        self.engine = create_engine(self.url, **kw)
        _Base.metadata.create_all(self.engine)

    def get_profile(self, user_id: str) -> dict | None:
        with Session(self.engine) as s:
            row = s.get(ProfileRow, user_id)
            return dict(row.data) if row else None

    def put_profile(self, user_id: str, data: dict) -> None:
        with Session(self.engine) as s, s.begin():
            row = s.get(ProfileRow, user_id)
            if row is None:
                s.add(ProfileRow(user_id=user_id, data=data, updated=time.time()))
            else:
                row.data, row.updated = data, time.time()

    def delete_profile(self, user_id: str) -> bool:
        with Session(self.engine) as s, s.begin():
            return s.execute(delete(ProfileRow).where(ProfileRow.user_id == user_id)).rowcount > 0

    def delete_user(self, user_id: str) -> bool:
        """Forget a user: profile and all history. True if there was anything."""
        with Session(self.engine) as s, s.begin():
            n = s.execute(delete(ProfileRow).where(ProfileRow.user_id == user_id)).rowcount
            n += s.execute(delete(TurnRow).where(TurnRow.user_id == user_id)).rowcount
        return n > 0

    def delete_history(self, user_id: str) -> int:
        with Session(self.engine) as s, s.begin():
            return s.execute(delete(TurnRow).where(TurnRow.user_id == user_id)).rowcount

    def history(self, user_id: str, model: str, limit: int) -> list[dict]:
        """The last `limit` messages of this user with this model, oldest first."""
        with Session(self.engine) as s:
            rows = s.scalars(
                select(TurnRow)
                .where(TurnRow.user_id == user_id, TurnRow.model == model)
                .order_by(TurnRow.id.desc())
                .limit(limit)
            ).all()
        return [{"role": r.role, "content": r.content} for r in reversed(rows)]

    def append(self, user_id: str, model: str, messages: list[dict]) -> None:
        now = time.time()
        with Session(self.engine) as s, s.begin():
            s.add_all(
                TurnRow(user_id=user_id, model=model, role=m["role"], content=m["content"], created=now)
                for m in messages
            )
            s.flush()
            where = (TurnRow.user_id == user_id, TurnRow.model == model)
            count = s.scalar(select(func.count()).select_from(TurnRow).where(*where))
            if count > self.cap:  # keep the newest `cap` messages
                old = select(TurnRow.id).where(*where).order_by(TurnRow.id).limit(count - self.cap)
                s.execute(delete(TurnRow).where(TurnRow.id.in_(old.scalar_subquery())))

    def close(self) -> None:
        self.engine.dispose()
