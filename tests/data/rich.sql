-- A small database with the things a dump must carry: several schemas, unicode, jsonb, bytea,
-- a large object, sequences, a view, a function, a trigger and names that need quoting.
CREATE SCHEMA erp;
CREATE SCHEMA "Ação Fiscal";

CREATE TABLE erp.customers (
    id         bigserial PRIMARY KEY,
    name       text NOT NULL,
    email      text UNIQUE,
    profile    jsonb NOT NULL DEFAULT '{}',
    avatar     bytea,
    created_at timestamptz NOT NULL DEFAULT '2025-11-19 02:00:00+00'
);

CREATE TABLE erp.invoices (
    id          serial PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES erp.customers(id),
    total       numeric(12,2) NOT NULL,
    notes       text,
    updated_at  timestamptz
);

CREATE TABLE "Ação Fiscal"."Notas ""Fiscais"" (2025)" (
    "Número" integer PRIMARY KEY,
    "Descrição com espaço" text,
    "select" text
);

CREATE SEQUENCE erp.order_no START 1000 INCREMENT 7;
SELECT nextval('erp.order_no'), nextval('erp.order_no'), nextval('erp.order_no');

INSERT INTO erp.customers (name, email, profile, avatar)
SELECT 'Cliente ' || i || ' — São Paulo ✓ 日本語 🐘',
       'c' || i || '@example.com',
       jsonb_build_object('tier', i % 3, 'tags', jsonb_build_array('a', 'b', i), 'nested', jsonb_build_object('x', i * 1.5)),
       decode(md5(i::text), 'hex') || '\x00ff00'::bytea
FROM generate_series(1, 300) AS i;

INSERT INTO erp.invoices (customer_id, total, notes)
SELECT 1 + (i % 300), round((i * 13.37)::numeric, 2),
       CASE WHEN i % 5 = 0 THEN E'linha 1\nlinha 2\ttab \\ barra' END
FROM generate_series(1, 1200) AS i;

INSERT INTO "Ação Fiscal"."Notas ""Fiscais"" (2025)" VALUES
    (1, 'primeira nota', 'palavra reservada'), (2, E'aspas \' e "duplas"', NULL), (3, '', 'x');

CREATE VIEW erp.customer_totals AS
    SELECT c.id, c.name, sum(i.total) AS total FROM erp.customers c JOIN erp.invoices i ON i.customer_id = c.id
    GROUP BY c.id, c.name;

CREATE FUNCTION erp.touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := '2025-11-19 03:00:00+00';
    RETURN NEW;
END $$;

CREATE TRIGGER invoices_touch BEFORE UPDATE ON erp.invoices FOR EACH ROW EXECUTE FUNCTION erp.touch();

UPDATE erp.invoices SET total = total + 1 WHERE id <= 10;

SELECT lo_from_bytea(424242, convert_to('large object contents ✓', 'UTF8'));
COMMENT ON TABLE erp.customers IS 'clientes do ERP';
