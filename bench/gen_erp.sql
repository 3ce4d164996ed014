-- ERP-like benchmark database, reproducible: every table is generated single-threaded by
-- INSERT ... SELECT from generate_series, with random() seeded per table (setseed), so a rerun with the
-- same row counts on the same PostgreSQL major version gives the same data.
--
-- Row counts come in as psql variables (bench/run.py maps --size onto them):
--   psql -v ON_ERROR_STOP=1 -v accounts=1000000 -v orders=250000 -v customers=50000 \
--        -v invoice_lines=600000 -d erp -f bench/gen_erp.sql
--
-- Tables:
--   pgbench_*      what `pgbench -i` builds (server-side generation, -I dtGvp), for any row count:
--                  100,000 accounts per branch, blank filler (compresses about x100)
--   orders         appendix A of shared/notes/perf-baseline.md, unchanged except the row count
--                  (names, addresses with umlauts, numeric amounts, timestamps, jsonb line items)
--   customers      the customers the orders refer to (same names and e-mail addresses), jsonb attributes
--   invoice_lines  invoice lines per order: sku, description, numerics, account codes
-- No foreign keys: restores load tables in any order, as a parallel pg_restore does.

\set ON_ERROR_STOP 1
SET client_min_messages = warning;
SELECT greatest(1, ceil(:accounts / 100000.0))::int AS branches \gset

-- pgbench ------------------------------------------------------------------------------------------
DROP TABLE IF EXISTS pgbench_accounts, pgbench_branches, pgbench_history, pgbench_tellers;
CREATE TABLE pgbench_history (tid int, bid int, aid int, delta int, mtime timestamp, filler char(22));
CREATE TABLE pgbench_tellers (tid int NOT NULL, bid int, tbalance int, filler char(84)) WITH (fillfactor = 100);
CREATE TABLE pgbench_accounts (aid int NOT NULL, bid int, abalance int, filler char(84)) WITH (fillfactor = 100);
CREATE TABLE pgbench_branches (bid int NOT NULL, bbalance int, filler char(88)) WITH (fillfactor = 100);
INSERT INTO pgbench_branches (bid, bbalance) SELECT bid, 0 FROM generate_series(1, :branches) bid;
INSERT INTO pgbench_tellers (tid, bid, tbalance) SELECT tid, (tid - 1) / 10 + 1, 0 FROM generate_series(1, 10 * :branches) tid;
INSERT INTO pgbench_accounts (aid, bid, abalance, filler)
SELECT aid, (aid - 1) / 100000 + 1, 0, '' FROM generate_series(1, :accounts) aid;
ALTER TABLE pgbench_branches ADD PRIMARY KEY (bid);
ALTER TABLE pgbench_tellers ADD PRIMARY KEY (tid);
ALTER TABLE pgbench_accounts ADD PRIMARY KEY (aid);

-- orders (appendix A) ----------------------------------------------------------------------------------
SELECT setseed(0.42);
DROP TABLE IF EXISTS orders;
CREATE TABLE orders (
  order_id      bigint PRIMARY KEY,
  order_no      text        NOT NULL,
  customer_id   int         NOT NULL,
  customer_name text        NOT NULL,
  email         text        NOT NULL,
  ship_address  text        NOT NULL,
  status        text        NOT NULL,
  currency      char(3)     NOT NULL,
  total_amount  numeric(12,2) NOT NULL,
  created_at    timestamptz NOT NULL,
  updated_at    timestamptz,
  line_items    jsonb       NOT NULL,
  notes         text
);
INSERT INTO orders
SELECT s.i,
       'SO-' || lpad(s.i::text, 9, '0'),
       s.cid,
       fn[1 + s.cid % 26] || ' ' || ln[1 + (s.cid / 26) % 40],
       lower(fn[1 + s.cid % 26]) || '.' || lower(ln[1 + (s.cid / 26) % 40]) || s.cid || '@example.com',
       (1 + s.cid % 250) || ' ' || st[1 + (s.cid / 7) % 30] || ', ' ||
         lpad(((s.cid * 7919) % 90000 + 10000)::text, 5, '0') || ' ' || ci[1 + (s.cid / 3) % 24] || ', ' || co[1 + s.cid % 6],
       (ARRAY['new','confirmed','picking','shipped','invoiced','paid','cancelled'])[1 + (s.r1 * 7)::int % 7],
       (ARRAY['EUR','EUR','EUR','USD','GBP','CHF'])[1 + s.cid % 6],
       (SELECT sum((e->>'qty')::int * (e->>'unit_price')::numeric) FROM jsonb_array_elements(s.li) e),
       s.ts,
       CASE WHEN s.r1 < 0.8 THEN s.ts + (s.r2 * interval '20 days') END,
       s.li,
       CASE WHEN s.r2 < 0.3 THEN 'Customer note: ' || (ARRAY['deliver to back door','call before delivery','partial delivery ok','invoice to HQ','urgent'])[1 + (s.r2 * 1000)::int % 5] || ' ref ' || md5(s.i::text) END
FROM (
  SELECT i,
         1 + floor(random() * 200000)::int AS cid,
         random() AS r1, random() AS r2,
         timestamptz '2019-01-01 00:00:00+00' + (i * interval '150 seconds') + (random() * interval '1 hour') AS ts,
         (SELECT jsonb_agg(jsonb_build_object(
                    'sku', 'SKU-' || lpad(((i * 31 + k * 17) % 50000)::text, 6, '0'),
                    'name', (ARRAY['Widget','Gadget','Bolt M8','Nut M8','Washer','Bracket','Hinge','Cable 2m','Adapter','Sensor',
                                   'Valve','Pump','Filter','Gasket','Bearing','Motor','Relay','Switch','Fuse','Panel'])[1 + (i + k) % 20],
                    'qty', 1 + floor(random() * 10)::int,
                    'unit_price', round((1 + random() * 200)::numeric, 2)))
            FROM generate_series(1, 1 + (i % 4)) k) AS li
  FROM generate_series(1, :orders) i
) s,
LATERAL (SELECT '{Anna,Ben,Carla,David,Elena,Felix,Greta,Hugo,Ines,Jonas,Klara,Lukas,Maria,Noah,Olga,Paul,Quinn,Rosa,Stefan,Tanja,Uwe,Vera,Walter,Xenia,Yusuf,Zoe}'::text[] AS fn,
                '{Müller,Schmidt,Schneider,Fischer,Weber,Meyer,Wagner,Becker,Schulz,Hoffmann,Smith,Johnson,Williams,Brown,Jones,Garcia,Miller,Davis,Rodriguez,Martinez,Dubois,Martin,Bernard,Rossi,Russo,Ferrari,Novak,Kowalski,Nowak,Jensen,Hansen,Larsen,Silva,Santos,Costa,Kim,Lee,Tanaka,Suzuki,Öztürk}'::text[] AS ln,
                '{Main Street,High Street,Station Road,Church Lane,Mill Road,Park Avenue,Oak Drive,Hauptstraße,Bahnhofstraße,Gartenweg,Schulstraße,Rue de la Paix,Via Roma,Kingsway,Harbour Road,Market Square,Elm Street,Lindenallee,Bergstraße,Seeweg,Industriestraße,Ringstraße,Dorfstraße,Waldweg,Kirchplatz,Am Markt,Rosenweg,Birkenweg,Ahornweg,Feldstraße}'::text[] AS st,
                '{Berlin,Hamburg,München,Köln,Frankfurt,Stuttgart,Düsseldorf,Leipzig,Dresden,Hannover,Nürnberg,Bremen,Wien,Graz,Zürich,Basel,Paris,Lyon,London,Manchester,Milano,Torino,Warszawa,København}'::text[] AS ci,
                '{DE,DE,AT,CH,FR,GB}'::text[] AS co) a;
CREATE INDEX orders_customer_idx ON orders (customer_id);
CREATE INDEX orders_created_idx  ON orders (created_at);

-- customers ----------------------------------------------------------------------------------------
-- Same name, e-mail and address formulas as the orders, so customer_id joins give consistent rows.
SELECT setseed(0.17);
DROP TABLE IF EXISTS customers;
CREATE TABLE customers (
  customer_id   int PRIMARY KEY,
  name          text          NOT NULL,
  email         text          NOT NULL,
  phone         text,
  address       text          NOT NULL,
  country       char(2)       NOT NULL,
  vat_id        text,
  segment       text          NOT NULL,
  credit_limit  numeric(12,2) NOT NULL,
  created_at    timestamptz   NOT NULL,
  attributes    jsonb         NOT NULL
);
INSERT INTO customers
SELECT c.cid,
       fn[1 + c.cid % 26] || ' ' || ln[1 + (c.cid / 26) % 40],
       lower(fn[1 + c.cid % 26]) || '.' || lower(ln[1 + (c.cid / 26) % 40]) || c.cid || '@example.com',
       CASE WHEN c.r1 < 0.85 THEN '+' || (ARRAY['49','49','43','41','33','44'])[1 + c.cid % 6] || ' '
                                      || (100 + floor(c.r2 * 900)::int) || ' ' || lpad(floor(random() * 10000000)::int::text, 7, '0') END,
       (1 + c.cid % 250) || ' ' || st[1 + (c.cid / 7) % 30] || ', ' ||
         lpad(((c.cid * 7919) % 90000 + 10000)::text, 5, '0') || ' ' || ci[1 + (c.cid / 3) % 24] || ', ' || co[1 + c.cid % 6],
       co[1 + c.cid % 6],
       CASE WHEN c.r2 < 0.6 THEN co[1 + c.cid % 6] || lpad(floor(random() * 1000000000)::int::text, 9, '0') END,
       (ARRAY['retail','retail','retail','wholesale','wholesale','public sector','key account'])[1 + (c.r1 * 7)::int % 7],
       round((500 + c.r2 * 49500)::numeric, -2),
       timestamptz '2015-01-01 00:00:00+00' + (c.cid * interval '17 minutes') + (random() * interval '1 day'),
       jsonb_build_object(
         'payment_terms', (ARRAY['net 14','net 30','net 30','net 60','prepaid'])[1 + (c.r1 * 1000)::int % 5],
         'language', (ARRAY['de','de','de','en','fr','it'])[1 + c.cid % 6],
         'newsletter', c.r1 < 0.4,
         'discount_pct', round((c.r2 * 15)::numeric, 1),
         'tags', (SELECT coalesce(jsonb_agg(t), '[]'::jsonb)
                    FROM unnest(ARRAY['vip','late payer','eu','export','b2b','b2c','sample']) t
                   WHERE random() < 0.25))
FROM (SELECT cid, random() AS r1, random() AS r2 FROM generate_series(1, :customers) cid) c,
LATERAL (SELECT '{Anna,Ben,Carla,David,Elena,Felix,Greta,Hugo,Ines,Jonas,Klara,Lukas,Maria,Noah,Olga,Paul,Quinn,Rosa,Stefan,Tanja,Uwe,Vera,Walter,Xenia,Yusuf,Zoe}'::text[] AS fn,
                '{Müller,Schmidt,Schneider,Fischer,Weber,Meyer,Wagner,Becker,Schulz,Hoffmann,Smith,Johnson,Williams,Brown,Jones,Garcia,Miller,Davis,Rodriguez,Martinez,Dubois,Martin,Bernard,Rossi,Russo,Ferrari,Novak,Kowalski,Nowak,Jensen,Hansen,Larsen,Silva,Santos,Costa,Kim,Lee,Tanaka,Suzuki,Öztürk}'::text[] AS ln,
                '{Main Street,High Street,Station Road,Church Lane,Mill Road,Park Avenue,Oak Drive,Hauptstraße,Bahnhofstraße,Gartenweg,Schulstraße,Rue de la Paix,Via Roma,Kingsway,Harbour Road,Market Square,Elm Street,Lindenallee,Bergstraße,Seeweg,Industriestraße,Ringstraße,Dorfstraße,Waldweg,Kirchplatz,Am Markt,Rosenweg,Birkenweg,Ahornweg,Feldstraße}'::text[] AS st,
                '{Berlin,Hamburg,München,Köln,Frankfurt,Stuttgart,Düsseldorf,Leipzig,Dresden,Hannover,Nürnberg,Bremen,Wien,Graz,Zürich,Basel,Paris,Lyon,London,Manchester,Milano,Torino,Warszawa,København}'::text[] AS ci,
                '{DE,DE,AT,CH,FR,GB}'::text[] AS co) a;
CREATE INDEX customers_email_idx ON customers (email);

-- invoice_lines --------------------------------------------------------------------------------------
-- About 2.5 lines per invoice, one invoice per order (order_id cycles through 1..:orders).
SELECT setseed(0.73);
DROP TABLE IF EXISTS invoice_lines;
CREATE TABLE invoice_lines (
  line_id       bigint PRIMARY KEY,
  invoice_no    text          NOT NULL,
  order_id      bigint        NOT NULL,
  line_no       smallint      NOT NULL,
  sku           text          NOT NULL,
  description   text          NOT NULL,
  qty           int           NOT NULL,
  unit_price    numeric(12,2) NOT NULL,
  discount_pct  numeric(5,2)  NOT NULL,
  tax_rate      numeric(4,2)  NOT NULL,
  net_amount    numeric(12,2) NOT NULL,
  account_code  text          NOT NULL,
  booked_at     timestamptz   NOT NULL
);
INSERT INTO invoice_lines
SELECT l.i,
       'INV-' || to_char(l.booked, 'YYYY') || '-' || lpad(l.oid::text, 9, '0'),
       l.oid,
       l.line_no,
       'SKU-' || lpad(l.sku::text, 6, '0'),
       (ARRAY['Widget','Gadget','Bolt M8','Nut M8','Washer','Bracket','Hinge','Cable 2m','Adapter','Sensor',
              'Valve','Pump','Filter','Gasket','Bearing','Motor','Relay','Switch','Fuse','Panel'])[1 + l.sku % 20]
         || ' ' || (ARRAY['standard','premium','stainless','galvanised','black','white','XL','mini'])[1 + l.sku % 8]
         || CASE WHEN l.r1 < 0.2 THEN ', batch ' || substr(md5(l.i::text), 1, 10) ELSE '' END,
       l.qty,
       l.price,
       l.discount,
       l.tax,
       round(l.qty * l.price * (1 - l.discount / 100), 2),
       (ARRAY['4000','4000','4010','4100','4200','8400','8300','8125'])[1 + (l.r1 * 8)::int % 8] || '-'
         || (ARRAY['DE','DE','AT','CH','FR','GB'])[1 + l.oid % 6],
       l.booked
FROM (
  SELECT i,
         1 + (i * 2 / 5) % :orders AS oid,
         (1 + i % 5)::smallint AS line_no,
         (i::bigint * 7919 + floor(random() * 50)::int) % 50000 AS sku,
         1 + floor(random() * 20)::int AS qty,
         round((0.5 + random() * 300)::numeric, 2) AS price,
         (ARRAY[0, 0, 0, 2, 5, 10])[1 + floor(random() * 6)::int]::numeric AS discount,
         (ARRAY[19, 19, 19, 7, 20, 8.1])[1 + floor(random() * 6)::int]::numeric AS tax,
         random() AS r1,
         timestamptz '2019-01-01 00:00:00+00' + ((i * 2 / 5) * interval '150 seconds') + (random() * interval '3 days') AS booked
  FROM generate_series(1, :invoice_lines) i
) l;
CREATE INDEX invoice_lines_order_idx ON invoice_lines (order_id);

VACUUM (ANALYZE);
CHECKPOINT;
